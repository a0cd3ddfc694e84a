"""MX numerics: plain torch tensors in, tensors out (no FX, no torch.library, no torch_npu)."""

from .dual_level import LEVEL0_BLOCK, LEVEL1_BLOCK, dequantize_dual_level, quantize_dual_level
from .e8m0 import e8m0_decode, shared_scale_bytes
from .elements import E2M1_MAX, E4M3_MAX, e2m1_decode, e2m1_encode, e4m3_encode
from .layout import from_paired_scales, nd_to_nz, nz_to_nd, to_paired_scales
from .mx import MX_FORMATS, dequantize_mx, quantize_mx
from .packing import pack_fp4, pack_int4, unpack_fp4, unpack_int4

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "LEVEL0_BLOCK",
    "LEVEL1_BLOCK",
    "MX_FORMATS",
    "dequantize_dual_level",
    "dequantize_mx",
    "e2m1_decode",
    "e2m1_encode",
    "e4m3_encode",
    "e8m0_decode",
    "from_paired_scales",
    "nd_to_nz",
    "nz_to_nd",
    "pack_fp4",
    "pack_int4",
    "quantize_dual_level",
    "quantize_mx",
    "shared_scale_bytes",
    "to_paired_scales",
    "unpack_fp4",
    "unpack_int4",
]
