"""mxfx::npu_rotate_quant: torch_npu's fused block rotation + MX quantization (Ascend 950, torch_npu 26.1.0+),
argument for argument, with the A5 kernel's arithmetic.

Sources: the schema is op-plugin's (Ascend/op-plugin @ 517f2e7d, op_plugin/config/op_plugin_functions.yaml;
op_plugin/ops/opapi/RotateQuantKernelNpuOpApi.cpp; docs/zh/custom_APIs/torch_npu/torch_npu-npu_rotate_quant.md),
the constraints aclnnRotateQuant's (hicann/ops-nn @ e5c3fa93, matmul/rotate_quant/op_api/aclnn_rotate_quant.cpp,
op_host/arch35/rotate_quant_tiling.cpp), the arithmetic the arch35 kernel's (op_kernel/arch35/
rotate_quant_basic_cmct.h, matmul/common/cmct/kernel/kernel_rotate_quant.h and
epilogue/block_epilogue_rotate_quant.h). ops-nn ships no golden for the MX form (its doc formula is
Y = x.reshape(*, K) @ rotation, then clamp, then MX quant); where the doc is silent the kernel decides:

- Y = x @ diag(R): rotation [K, K] (every K-block of a row) or [N/K, K, K] (block b by rotation[b]), K in
  {32, 64, 128}, N = x's last dim a multiple of K. The cube accumulates the bf16/fp16 products in fp32 and
  writes Y as **bf16** (CType is bfloat16_t whatever x's dtype: an fp16 x is rotated into bf16, not fp16).
  The reference computes the fp32 products exactly and sums them in its own order (bit-exact wherever the
  fp32 sums are exact; else Y may differ by one bf16 ulp, as any two GEMMs may).
- alpha (bf16 [1], optional; the doc's "rotation angle scale factor" is a clamp): when 0 < alpha < 1 (the
  kernel tests its bits), each 32-group's limit = bf16(max|Y| * alpha) and Y is clamped to [-limit, limit];
  any other value, or None, clamps nothing.
- Y is MX-quantized along the last axis in blocks of 32 exactly as npu_dynamic_mx_quant quantizes a bf16
  tensor (the epilogue is that kernel's bf16 code: scale_alg 0 floor with byte-0 blocks flushed, 1 RCEIL
  for FP8, 2 for FP4 with dst_type_max 6/7 carry or RCEIL against dst_type_max in (6, 12]; inf/NaN blocks
  get scale 0xFF and zero elements; elements multiplied by the power of two in bf16, rounded by round_mode,
  saturated). An inf in x makes its whole K-block NaN (inf * 0 in the matmul).

Outputs, as torch_npu's eager op allocates them: y packed FP4 uint8 [..., N/2] or float8_e4m3fn [..., N];
scale float8_e8m0fnu [..., ceil(N/64), 2] (ConvertToScalarType(ACL_FLOAT8_E8M0); npu_dynamic_mx_quant's is
uint8; op-plugin's meta registration passes torch_npu.float8_e8m0fnu, to be checked on a device).

Refused by name: the Atlas A2/A3 forms (dst_dtype None / int8 / quint4x2: per-token int quantization),
float8_e5m2 (not emulated), axis other than the last, transpose_y=True (the kernel rejects it), and every
argument outside the A5 constraints above. torchair has no GE converter for this form (see mxfx.targets).
"""

import torch

from mxfx.recovery.rotation import rotate

from .dtypes import dtype_arg
from .quant import mx_quantized, mx_quantized_fake

OP = "npu_rotate_quant"
BLOCKS = (32, 64, 128)
GROUP = 32  # the MX block, and the clamp's group
_FORMATS = {"float4_e2m1fn_x2": "fp4_e2m1", "float8_e4m3fn": "fp8_e4m3"}
_SCALE_ALGS = {"fp4_e2m1": {0: "floor", 2: "dyn_range"}, "fp8_e4m3": {0: "floor", 1: "rceil"}}
_A2_A3 = {1: "int8", 258: "int8", 16: "quint4x2"}  # c10 Char / torch_npu int8 / c10 QUInt4x2

torch.library.define(
    f"mxfx::{OP}",
    "(Tensor x, Tensor rotation, *, Tensor? alpha=None, int? dst_dtype=None, int? axis=-1, str? round_mode=\"rint\", "
    "int? scale_alg=0, float? dst_type_max=0.0, bool? transpose_y=False) -> (Tensor, Tensor)",
)


def _check(x, rotation, alpha, dst_dtype, axis, round_mode, scale_alg, dst_type_max, transpose_y):
    """(element format, mxfx scale rule, round mode, dst_type_max) of a call, or a ValueError naming the argument."""
    if dst_dtype is None or dst_dtype in _A2_A3:
        raise ValueError(f"{OP}: dst_dtype={dst_dtype!r} is the Atlas A2/A3 per-token int "
                         f"({_A2_A3.get(dst_dtype, 'int8')}) form, not emulated; pass torch_npu.float4_e2m1fn_x2 (296) "
                         "or float8_e4m3fn (292), the Ascend 950 MX forms")
    fmt = _FORMATS[dtype_arg(dst_dtype, "dst_dtype", OP, tuple(_FORMATS))]
    if x.dtype not in (torch.bfloat16, torch.float16) or not 1 <= x.dim() <= 7 or x.numel() == 0:
        raise ValueError(f"{OP}: x must be a non-empty 1-7-D bf16/fp16 tensor, got {x.dtype} {list(x.shape)}")
    if rotation.dtype != x.dtype:
        raise ValueError(f"{OP}: rotation must have x's dtype {x.dtype}, got {rotation.dtype}")
    n, k = x.shape[-1], rotation.shape[-1]
    if rotation.dim() not in (2, 3) or k not in BLOCKS:
        raise ValueError(f"{OP}: rotation must be [K, K] or [N/K, K, K] with K in {BLOCKS}, got {list(rotation.shape)}")
    if n % k:
        raise ValueError(f"{OP}: the rotation block K={k} must divide x's last dim N={n}")
    expected = (k, k) if rotation.dim() == 2 else (n // k, k, k)
    if tuple(rotation.shape) != expected:
        raise ValueError(f"{OP}: rotation must have shape {list(expected)} for N={n}, got {list(rotation.shape)}")
    if axis not in (None, -1, x.dim() - 1):
        raise ValueError(f"{OP}: axis must be -1 or {x.dim() - 1} (the last), got {axis}")
    round_mode = "rint" if round_mode is None else round_mode
    if round_mode not in ("rint", "round", "floor") or (fmt == "fp8_e4m3" and round_mode != "rint"):
        raise ValueError(f"{OP}: round_mode {round_mode!r} not allowed for {fmt} (FP4: rint, round, floor; FP8: rint)")
    alg = 0 if scale_alg is None else scale_alg
    if alg not in _SCALE_ALGS[fmt]:
        raise ValueError(f"{OP}: scale_alg must be one of {sorted(_SCALE_ALGS[fmt])} for {fmt}, got {scale_alg!r}")
    limit = 0.0 if dst_type_max is None else float(dst_type_max)
    if (alg == 2 and not 6.0 <= limit <= 12.0) or (alg != 2 and limit != 0.0):
        raise ValueError(f"{OP}: dst_type_max must be in [6, 12] with scale_alg 2, else 0.0; got {dst_type_max}")
    if transpose_y:
        raise ValueError(f"{OP}: transpose_y=True is not supported (aclnnRotateQuant takes False only)")
    if alpha is not None and (alpha.dtype != torch.bfloat16 or tuple(alpha.shape) != (1,)):
        raise ValueError(f"{OP}: alpha must be a bf16 tensor of shape [1], got {alpha.dtype} {list(alpha.shape)}")
    return fmt, _SCALE_ALGS[fmt][alg], round_mode, limit


def rotated(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Y = x @ diag(rotation) with exact fp32 products, summed in fp32, rounded once to bf16 (the kernel's C)."""
    n = x.shape[-1] // rotation.shape[-1]
    blocks = rotation.float().expand(n, -1, -1) if rotation.dim() == 2 else rotation.float()
    return rotate(x.float(), blocks).to(torch.bfloat16)


def clamped(y: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """y (bf16) clamped per 32-group to +-bf16(max|y| * alpha) when 0 < alpha < 1, else y."""
    if alpha is None or not 0.0 < float(alpha) < 1.0:
        return y
    groups = y.reshape(*y.shape[:-1], -1, GROUP)
    limit = (groups.abs().amax(-1, keepdim=True).float() * alpha.float()).to(torch.bfloat16)  # exact, then rounded
    return torch.maximum(torch.minimum(groups, limit), -limit).reshape(y.shape)


@torch.library.register_kernel(f"mxfx::{OP}", ("cpu", "cuda"))
def _rotate_quant(x, rotation, *, alpha=None, dst_dtype=None, axis=-1, round_mode="rint", scale_alg=0,
                  dst_type_max=0.0, transpose_y=False):
    fmt, alg, round_mode, limit = _check(x, rotation, alpha, dst_dtype, axis, round_mode, scale_alg, dst_type_max,
                                         transpose_y)
    q, scale = mx_quantized(clamped(rotated(x, rotation), alpha), fmt, alg, round_mode, GROUP, limit)
    return q, scale.view(torch.float8_e8m0fnu)


@torch.library.register_fake(f"mxfx::{OP}")
def _rotate_quant_fake(x, rotation, *, alpha=None, dst_dtype=None, axis=-1, round_mode="rint", scale_alg=0,
                       dst_type_max=0.0, transpose_y=False):
    fmt, *_ = _check(x, rotation, alpha, dst_dtype, axis, round_mode, scale_alg, dst_type_max, transpose_y)
    q, scale = mx_quantized_fake(x, fmt, GROUP)
    return q, scale.view(torch.float8_e8m0fnu)

