"""mxfx::npu_dynamic_mx_quant and mxfx::npu_dynamic_dual_level_mx_quant: torch_npu's activation/weight
quantizers, argument for argument, with mxfx.formats as the CPU kernel and torch_npu's output shapes
(FP4 as uint8 [..., K/2], E8M0 scales as uint8 pairs [..., ceil(K/64), 2])."""

import torch

from mxfx.formats import quantize_dual_level, quantize_mx, to_paired_scales

from .dtypes import FLOAT4_E2M1FN_X2, FLOAT8_E4M3FN

_DST_FORMATS = {FLOAT8_E4M3FN: "fp8_e4m3", FLOAT4_E2M1FN_X2: "fp4_e2m1"}
_SCALE_ALGS = {0: "floor", 1: "rceil"}

torch.library.define(
    "mxfx::npu_dynamic_mx_quant",
    "(Tensor input, *, int axis=-1, str round_mode=\"rint\", int dst_type=296, int block_size=32, "
    "int? scale_alg=0, float dst_type_max=0.0, float max_low_bound=0.0) -> (Tensor, Tensor)",
)
torch.library.define(
    "mxfx::npu_dynamic_dual_level_mx_quant",
    "(Tensor input, *, Tensor? smooth_scale=None, str round_mode=\"rint\") -> (Tensor, Tensor, Tensor)",
)


def _check_mx_args(input, axis, dst_type, scale_alg, dst_type_max, max_low_bound):
    if axis not in (-1, input.dim() - 1):
        raise ValueError(f"npu_dynamic_mx_quant: only the last axis is supported here, got axis={axis}")
    if dst_type not in _DST_FORMATS:
        raise ValueError(f"npu_dynamic_mx_quant: dst_type {dst_type} not supported; use 292 (float8_e4m3fn) or 296 (float4_e2m1fn_x2)")
    if (scale_alg or 0) not in _SCALE_ALGS:
        raise ValueError(f"npu_dynamic_mx_quant: scale_alg must be 0 or 1, got {scale_alg}")
    if dst_type_max != 0.0 or max_low_bound != 0.0:
        raise ValueError("npu_dynamic_mx_quant: dst_type_max and max_low_bound other than 0.0 are not supported")


@torch.library.register_kernel("mxfx::npu_dynamic_mx_quant", ("cpu", "cuda"))
def _dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=FLOAT4_E2M1FN_X2, block_size=32,
                      scale_alg=0, dst_type_max=0.0, max_low_bound=0.0):
    _check_mx_args(input, axis, dst_type, scale_alg, dst_type_max, max_low_bound)
    q, scale = quantize_mx(input, _DST_FORMATS[dst_type], block_size, _SCALE_ALGS[scale_alg or 0], round_mode)
    return q, to_paired_scales(scale)


@torch.library.register_fake("mxfx::npu_dynamic_mx_quant")
def _dynamic_mx_quant_fake(input, *, axis=-1, round_mode="rint", dst_type=FLOAT4_E2M1FN_X2, block_size=32,
                           scale_alg=0, dst_type_max=0.0, max_low_bound=0.0):
    _check_mx_args(input, axis, dst_type, scale_alg, dst_type_max, max_low_bound)
    *lead, k = input.shape
    if dst_type == FLOAT4_E2M1FN_X2:
        y = input.new_empty((*lead, k // 2), dtype=torch.uint8)
    else:
        y = input.new_empty(input.shape, dtype=torch.float8_e4m3fn)
    pairs = (k + 2 * block_size - 1) // (2 * block_size)  # ceil(ceil(K / block_size) / 2)
    return y, input.new_empty((*lead, pairs, 2), dtype=torch.uint8)


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
