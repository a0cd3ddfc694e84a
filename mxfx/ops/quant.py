"""mxfx::npu_dynamic_mx_quant and mxfx::npu_dynamic_dual_level_mx_quant: torch_npu's activation/weight
quantizers, argument for argument, with mxfx.formats as the CPU kernel and torch_npu's output shapes
(FP4 as uint8 [..., K/2], E8M0 scales as uint8 pairs [..., ceil(K/64), 2]).

dst_type takes what torch_npu takes (torch.float8_e4m3fn, 24, 292; FP4 as torch_npu's 296, see
dtypes); round_mode defaults to "rint" as torch_npu's does ("round" and "floor" for FP4 only).
Not emulated, refused by name: other axes than the last, e5m2 / e1m2 / HiFloat8 destinations."""

import torch

from mxfx.formats import quantize_dual_level, quantize_mx, to_paired_scales
from mxfx.formats.elements import check_round_mode
from mxfx.formats.mx import check_scale_args

from .dtypes import FLOAT4_E2M1FN_X2, dtype_arg

_DST_FORMATS = {"float8_e4m3fn": "fp8_e4m3", "float4_e2m1fn_x2": "fp4_e2m1"}
_SCALE_ALGS = {0: "floor", 1: "rceil", 2: "dyn_range"}

torch.library.define(
    "mxfx::npu_dynamic_mx_quant",
    "(Tensor input, *, int axis=-1, str round_mode=\"rint\", int dst_type=296, int block_size=32, "
    "int? scale_alg=0, float dst_type_max=0.0, float max_low_bound=0.0) -> (Tensor, Tensor)",
)
torch.library.define(
    "mxfx::npu_dynamic_dual_level_mx_quant",
    "(Tensor input, *, Tensor? smooth_scale=None, str round_mode=\"rint\") -> (Tensor, Tensor, Tensor)",
)


def _mx_args(input, axis, dst_type, scale_alg) -> tuple[str, str]:
    """(element format, scale rule) of a call, or a ValueError naming the argument."""
    if axis not in (-1, input.dim() - 1):
        raise ValueError(f"npu_dynamic_mx_quant: only the last axis is emulated, got axis={axis}")
    fmt = _DST_FORMATS[dtype_arg(dst_type, "dst_type", "npu_dynamic_mx_quant", tuple(_DST_FORMATS))]
    alg = 0 if scale_alg is None else scale_alg  # torch_npu's None means 0
    if alg not in _SCALE_ALGS:
        raise ValueError(f"npu_dynamic_mx_quant: scale_alg must be 0, 1 or 2, got {scale_alg}")
    return fmt, _SCALE_ALGS[alg]


def mx_quantized(y, fmt, scale_alg, round_mode, block_size=32, dst_type_max=0.0, max_low_bound=0.0):
    """(codes, paired E8M0 scales) of y's last axis, in torch_npu's output layout: what
    npu_dynamic_mx_quant returns, and the quantization step of the fused norm / SwiGLU ops."""
    q, scale = quantize_mx(y, fmt, block_size, scale_alg, round_mode, dst_type_max, max_low_bound)
    return q, to_paired_scales(scale)


def mx_quantized_fake(y, fmt, block_size=32):
    """Fake (codes, scales) for quantizing y's last axis: FP4 uint8 [..., K/2] or E4M3 [..., K], and uint8
    [..., ceil(ceil(K / block_size) / 2), 2]."""
    *lead, k = y.shape
    if fmt == "fp4_e2m1":
        q = y.new_empty((*lead, k // 2), dtype=torch.uint8)
    else:
        q = y.new_empty(y.shape, dtype=torch.float8_e4m3fn)
    pairs = (k + 2 * block_size - 1) // (2 * block_size)
    return q, y.new_empty((*lead, pairs, 2), dtype=torch.uint8)


FUSED_SCALE_ALGS = {0: "floor", 1: "rceil"}  # what the norm / SwiGLU fusions take (their aclnn docs)


def fused_mx_args(op, dst_type, scale_alg, round_mode) -> tuple[str, str]:
    """(element format, scale rule) of a fused op's quantization step (block 32, scale_alg 0 or 1, 1 for
    FP8 only, FP8 rounds rint only), or a ValueError naming the argument."""
    fmt = _DST_FORMATS[dtype_arg(dst_type, "dst_type", op, tuple(_DST_FORMATS))]
    if scale_alg not in FUSED_SCALE_ALGS:
        raise ValueError(f"{op}: scale_alg must be 0 or 1 (the fused kernels have no scale_alg 2), got {scale_alg!r}")
    check_round_mode(round_mode)
    if fmt == "fp8_e4m3" and round_mode != "rint":
        raise ValueError(f"{op}: FP8 destinations round 'rint' only, got {round_mode!r}")
    alg = FUSED_SCALE_ALGS[scale_alg]
    check_scale_args(fmt, 32, alg, 0.0, 0.0)
    return fmt, alg


@torch.library.register_kernel("mxfx::npu_dynamic_mx_quant", ("cpu", "cuda"))
def _dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=FLOAT4_E2M1FN_X2, block_size=32,
                      scale_alg=0, dst_type_max=0.0, max_low_bound=0.0):
    fmt, alg = _mx_args(input, axis, dst_type, scale_alg)
    return mx_quantized(input, fmt, alg, round_mode, block_size, dst_type_max, max_low_bound)


@torch.library.register_fake("mxfx::npu_dynamic_mx_quant")
def _dynamic_mx_quant_fake(input, *, axis=-1, round_mode="rint", dst_type=FLOAT4_E2M1FN_X2, block_size=32,
                           scale_alg=0, dst_type_max=0.0, max_low_bound=0.0):
    fmt, alg = _mx_args(input, axis, dst_type, scale_alg)
    check_scale_args(fmt, block_size, alg, dst_type_max, max_low_bound)
    return mx_quantized_fake(input, fmt, block_size)


def _smoothed(input, smooth_scale):
    if smooth_scale is None:
        return input
    if smooth_scale.shape != input.shape[-1:]:
        raise ValueError(f"smooth_scale must have shape [{input.shape[-1]}], got {list(smooth_scale.shape)}")
    return input * smooth_scale.to(input.dtype)  # the kernel multiplies in the input dtype


@torch.library.register_kernel("mxfx::npu_dynamic_dual_level_mx_quant", ("cpu", "cuda"))
def _dynamic_dual_level_mx_quant(input, *, smooth_scale=None, round_mode="rint"):
    q, level0, level1 = quantize_dual_level(_smoothed(input, smooth_scale), round_mode)
    return q, level0, to_paired_scales(level1)


@torch.library.register_fake("mxfx::npu_dynamic_dual_level_mx_quant")
def _dynamic_dual_level_mx_quant_fake(input, *, smooth_scale=None, round_mode="rint"):
    *lead, k = input.shape
    return (
        input.new_empty((*lead, k // 2), dtype=torch.uint8),
        input.new_empty((*lead, (k + 511) // 512), dtype=torch.float32),
        input.new_empty((*lead, (k + 63) // 64, 2), dtype=torch.uint8),
    )
