"""mxfx::npu_dual_level_quant_matmul and mxfx::npu_quant_matmul (its MX modes): torch_npu's quantized
matmuls, argument for argument, with a CPU reference that dequantizes the operands exactly in fp32
(element times E8M0 power of two) and accumulates in fp32: per level-0 group of 512 one batched
matmul, scaled by level0(x1) * level0(x2) and summed over the groups in order, then the bias in fp32,
then a single cast to the output dtype (ops-nn golden, notes/npu_ops.md §3.1, §4.3). The order of the
additions inside a group is the BLAS's: the NPU's own order is not documented."""

import math

import torch

from mxfx.formats import dequantize_mx, from_paired_scales, nz_to_nd
from mxfx.tensor_cache import TensorCache

from .dtypes import FLOAT4_E2M1FN_X2, FLOAT8_E8M0FNU, from_scalar_type

torch.library.define(
    "mxfx::npu_dual_level_quant_matmul",
    "(Tensor x1, Tensor x2, Tensor x1_level0_scale, Tensor x2_level0_scale, Tensor x1_level1_scale, "
    "Tensor x2_level1_scale, *, Tensor? bias=None, int output_dtype=15) -> Tensor",
)
torch.library.define(
    "mxfx::npu_quant_matmul",
    "(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, Tensor? pertoken_scale=None, "
    "Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, int? x2_dtype=None, "
    "int? pertoken_scale_dtype=None, int? scale_dtype=None, int[]? group_sizes=None, "
    "Tensor? y_scale=None) -> Tensor",
)

LEVEL0 = 512


# The weight operand decoded to the fp32 GEMM layout, kept while the weight constant lives: a graph calls
# the matmul with the same constants every time, and unpacking and decoding them on each call would
# cost 10-40x the GEMM at M=1. The NPU reads the packed bytes itself; this is an emulation speed-up
# that holds 4 bytes per weight element.
DECODED_WEIGHTS = TensorCache()


def _mx_operand(q: torch.Tensor, paired_scale: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """fp32 [rows, K] = element * 2**(scale - 127); exact (a power-of-two product)."""
    scale = from_paired_scales(paired_scale, math.ceil(k / 32))
    return dequantize_mx(q, scale, fmt)


def _finish(acc: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float().reshape(-1)
    return acc.to(dtype)


def _dual_level_shapes(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale):
    if x1.dim() != 2:
        raise ValueError(f"npu_dual_level_quant_matmul: x1 must be 2-D [M, K/2], got {list(x1.shape)}")
    m, k = x1.shape[0], 2 * x1.shape[1]
    n = x2_level1_scale.shape[0]
    groups0, pairs = (k + LEVEL0 - 1) // LEVEL0, (k + 63) // 64
    expected = {
        "x2 (emulated FRACTAL_NZ int8)": (x2, ((k // 2 + 31) // 32, (n + 15) // 16, 16, 32)),
        "x1_level0_scale": (x1_level0_scale, (m, groups0)),
        "x2_level0_scale": (x2_level0_scale, (groups0, n)),
        "x1_level1_scale": (x1_level1_scale, (m, pairs, 2)),
        "x2_level1_scale": (x2_level1_scale, (n, pairs, 2)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"npu_dual_level_quant_matmul: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
    return m, k, n


@torch.library.register_kernel("mxfx::npu_dual_level_quant_matmul", ("cpu", "cuda"))
def _dual_level_quant_matmul(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale,
                             *, bias=None, output_dtype=15):
    """x2 is the FP4 weight [N, K/2] as the emulated NZ layout that mxfx::npu_format_cast returns."""
    m, k, n = _dual_level_shapes(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale)
    groups0 = x1_level0_scale.shape[1]
    pad = groups0 * LEVEL0 - k

    def decode_weight():  # [G0, 512, N]
        b = _mx_operand(nz_to_nd(x2, n, k // 2), x2_level1_scale, "fp4_e2m1", k)
        return torch.nn.functional.pad(b, (0, pad)).view(n, groups0, LEVEL0).permute(1, 2, 0).contiguous()

    b = DECODED_WEIGHTS.get((x2, x2_level1_scale), decode_weight)
    a = _mx_operand(x1, x1_level1_scale, "fp4_e2m1", k)
    a = torch.nn.functional.pad(a, (0, pad)).view(m, groups0, LEVEL0).transpose(0, 1)  # [G0, M, 512]
    partial = torch.bmm(a, b)  # [G0, M, N]
    scale0 = x1_level0_scale.t().unsqueeze(-1) * x2_level0_scale.unsqueeze(1)  # [G0, M, N]
    return _finish((scale0 * partial).sum(0), bias, from_scalar_type(output_dtype))


@torch.library.register_fake("mxfx::npu_dual_level_quant_matmul")
def _dual_level_quant_matmul_fake(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale,
                                  *, bias=None, output_dtype=15):
    m, _, n = _dual_level_shapes(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale)
    return x1.new_empty((m, n), dtype=from_scalar_type(output_dtype))


def _quant_matmul_mode(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                       pertoken_scale_dtype, scale_dtype, group_sizes, y_scale) -> str:
    """The weight's element format for the two MX modes the reference implements, else a ValueError."""
    if offset is not None or y_scale is not None:
        raise ValueError("npu_quant_matmul (MX): offset and y_scale are not used by the MX modes")
    if pertoken_scale is None or scale_dtype != FLOAT8_E8M0FNU or pertoken_scale_dtype != FLOAT8_E8M0FNU:
        raise ValueError("npu_quant_matmul (MX): needs pertoken_scale and scale_dtype = pertoken_scale_dtype = 293 (float8_e8m0fnu)")
    if output_dtype is None:
        raise ValueError("npu_quant_matmul (MX): output_dtype is required")
    if x1.dtype != torch.float8_e4m3fn or x1_dtype not in (None, 292):
        raise ValueError(f"npu_quant_matmul (MX): x1 must be float8_e4m3fn, got {x1.dtype}")
    modes = {(1, 1, 32): None, (0, 0, 32): FLOAT4_E2M1FN_X2}
    sizes = tuple(group_sizes or ())
    if sizes not in modes or x2_dtype != modes[sizes]:
        raise ValueError(
            f"npu_quant_matmul (MX): supported are group_sizes [1,1,32] (FP8 x FP8) and [0,0,32] with "
            f"x2_dtype=296 (FP8 x FP4); got group_sizes={list(sizes)}, x2_dtype={x2_dtype}"
        )
    return "fp4_e2m1" if x2_dtype == FLOAT4_E2M1FN_X2 else "fp8_e4m3"


@torch.library.register_kernel("mxfx::npu_quant_matmul", ("cpu", "cuda"))
def _quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                  x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    """MX modes: x1 float8_e4m3fn [M, K] with pertoken_scale [M, K/64, 2]; x2 the weight as a [K, N]
    view of [N, K] (FP8) or a [K/2, N] view of packed FP4 [N, K/2], with scale the [K/64, N, 2] view
    of [N, K/64, 2]. Strides are honoured: the transposed views are read, never copied."""
    fmt = _quant_matmul_mode(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                             pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    k = x1.shape[-1]
    b = DECODED_WEIGHTS.get((x2, scale), lambda: _mx_operand(x2.t(), scale.transpose(0, 1), fmt, k).t().contiguous())
    a = _mx_operand(x1, pertoken_scale, "fp8_e4m3", k)
    return _finish(a @ b, bias, from_scalar_type(output_dtype))


@torch.library.register_fake("mxfx::npu_quant_matmul")
def _quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                       y_scale=None):
    _quant_matmul_mode(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                       pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    return x1.new_empty((x1.shape[0], x2.shape[1]), dtype=from_scalar_type(output_dtype))
