"""mxfx::npu_dual_level_quant_matmul and mxfx::npu_quant_matmul (its MX modes): torch_npu's quantized
matmuls, argument for argument, with a CPU reference that dequantizes the operands exactly in fp32
(element times E8M0 power of two) and accumulates in fp32: per level-0 group of 512 one batched
matmul, scaled by level0(x1) * level0(x2) and summed over the groups in order, then the bias in fp32,
then a single cast to the output dtype (ops-nn golden, notes/npu_ops.md §3.1, §4.3). The order of the
additions inside a group is the BLAS's: the NPU's own order is not documented."""

import math
from typing import NamedTuple

import torch

from mxfx.formats import dequantize_mx, from_paired_scales, nz_to_nd
from mxfx.tensor_cache import TensorCache

from .dtypes import from_scalar_type, tensor_dtype
from .format_cast import FP4_NZ_C0_BYTES

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
            raise ValueError(
                f"npu_dual_level_quant_matmul: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
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


_ELEMENTS = {"float8_e4m3fn": "fp8_e4m3", "float4_e2m1fn_x2": "fp4_e2m1"}
# (x1, x2) element formats of aclnnQuantMatmulV5's MX modes: full quant FP8 x FP8 and FP4 x FP4 (group
# sizes [1, 1, 32]), fake quant FP8 x FP4 (documented as [0, 0, 32] or [1, 1, 32])
_MX_MODES = (("fp8_e4m3", "fp8_e4m3"), ("fp4_e2m1", "fp4_e2m1"), ("fp8_e4m3", "fp4_e2m1"))
_STORAGE = {"fp8_e4m3": (torch.float8_e4m3fn,), "fp4_e2m1": (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)}
OP = "npu_quant_matmul (MX)"


class _MXCall(NamedTuple):
    fmt1: str
    fmt2: str
    m: int
    k: int
    n: int
    nz: bool  # x2 is the emulated FRACTAL_NZ of packed FP4 (npu_format_cast with input_dtype FP4)


def _operand_format(t, code, arg) -> str:
    fmt = _ELEMENTS[tensor_dtype(t, code, arg, OP, tuple(_ELEMENTS))]
    if t.dtype not in _STORAGE[fmt]:
        raise ValueError(f"{OP}: {arg} says {fmt} but the tensor is {t.dtype}; expected one of {_STORAGE[fmt]}")
    return fmt


def _group_sizes(group_sizes, pertoken_scale, scale, m, k, n) -> None:
    """Omitted group_sizes reach aclnn as groupSize 0 (op-plugin QuantMatmulKernelNpuOpApi.cpp), and
    aclnnQuantMatmulV5 infers every 0 from the shapes (groupSizeM = m / scaleM, ...): with MX scales
    that is [1, 1, 32], the one MX group size."""
    sizes = tuple(group_sizes) if group_sizes is not None else (0, 0, 0)
    if len(sizes) != 3:
        raise ValueError(f"{OP}: group_sizes must have three elements [m, n, k], got {list(sizes)}")
    inferred = (m // pertoken_scale.shape[0], n // scale.shape[1], k // (2 * scale.shape[0]) if k % 64 == 0 else 32)
    effective = tuple(s or i for s, i in zip(sizes, inferred))
    if effective != (1, 1, 32):
        raise ValueError(f"{OP}: group_sizes {list(sizes)} give {list(effective)} for these shapes; the MX modes "
                         "take [1, 1, 32] (zeros, or group_sizes omitted, are inferred from the scale shapes)")


def _quant_matmul_call(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                       pertoken_scale_dtype, scale_dtype, group_sizes, y_scale) -> _MXCall:
    """The MX mode of a call (element formats from the dtype arguments or the tensors, as torch_npu
    reads them), or a ValueError naming the argument."""
    if offset is not None or y_scale is not None:
        raise ValueError(f"{OP}: offset and y_scale are not used by the MX modes")
    if pertoken_scale is None:
        raise ValueError(f"{OP}: needs pertoken_scale (the x1 E8M0 scale)")
    tensor_dtype(scale, scale_dtype, "scale_dtype", OP, ("float8_e8m0fnu",))
    tensor_dtype(pertoken_scale, pertoken_scale_dtype, "pertoken_scale_dtype", OP, ("float8_e8m0fnu",))
    if output_dtype is None:  # torch_npu's default is int8, which no MX mode produces
        raise ValueError(f"{OP}: output_dtype is required (bf16, fp16 or fp32)")
    from_scalar_type(output_dtype, "output_dtype", OP)
    fmt1, fmt2 = _operand_format(x1, x1_dtype, "x1_dtype"), _operand_format(x2, x2_dtype, "x2_dtype")
    if (fmt1, fmt2) not in _MX_MODES:
        raise ValueError(f"{OP}: x1 {fmt1} with x2 {fmt2} is not an MX mode; supported: {list(_MX_MODES)}")
    if x1.dim() != 2:
        raise ValueError(f"{OP}: x1 must be 2-D [M, K] (FP4: [M, K/2] bytes), got {list(x1.shape)}")
    m, k = x1.shape[0], x1.shape[1] * (2 if fmt1 == "fp4_e2m1" else 1)
    if scale.dim() != 3 or scale.shape[0] != math.ceil(k / 64) or scale.shape[2] != 2:
        raise ValueError(f"{OP}: scale must be the [ceil(K/64), N, 2] view of the weight's [N, ceil(K/64), 2] "
                         f"E8M0 pairs (K={k}), got {list(scale.shape)}")
    n = scale.shape[1]
    if tuple(pertoken_scale.shape) != (m, math.ceil(k / 64), 2):
        raise ValueError(
            f"{OP}: pertoken_scale must have shape {[m, math.ceil(k / 64), 2]}, got {list(pertoken_scale.shape)}")
    nz = x2.dim() == 4
    if nz:  # as on the device, the orientation is the view's: the cast passed as is holds [K/2, N] (K-major,
        # vllm-ascend W4A4 with NZ on); its .transpose(-1, -2) is the cast of [N, K/2] (the W4A8 peers, mxfx).
        # The emulated NZ tensor has no logical shape: a cast of [N, K/2] passed as is, which the device
        # would refuse, is read K-major wherever its padded shape equals the [K/2, N] cast's.
        as_cast = x2.is_contiguous()
        rows, cols = (k // 2, n) if as_cast else (n, k // 2)
        nz_shape = (math.ceil(cols / FP4_NZ_C0_BYTES), math.ceil(rows / 16), 16, FP4_NZ_C0_BYTES)
        storage = x2 if as_cast else x2.transpose(-1, -2)
        if fmt2 != "fp4_e2m1" or tuple(storage.shape) != nz_shape or not storage.is_contiguous():
            raise ValueError(f"{OP}: a 4-D x2 is read as the emulated FRACTAL_NZ of packed FP4 (npu_format_cast "
                             "with input_dtype=float4_e2m1fn_x2): as cast, of the [K/2, N] weight, shape "
                             f"{[math.ceil(n / 16), math.ceil(k / 32), 16, 16]}; or the cast of [N, K/2] "
                             "transposed with .transpose(-1, -2), storage "
                             f"{[math.ceil(k / 32), math.ceil(n / 16), 16, 16]}; got {fmt2} {list(x2.shape)}")
    else:
        weight_shape = (k // 2, n) if fmt2 == "fp4_e2m1" else (k, n)
        if tuple(x2.shape) != weight_shape:
            raise ValueError(f"{OP}: x2 must be the {list(weight_shape)} view of the weight, got {list(x2.shape)}")
        if fmt2 == "fp4_e2m1" and not x2.t().is_contiguous():
            raise ValueError(f"{OP}: packed FP4 x2 must be the transposed view of [N, K/2] bytes (x2.t() contiguous)")
    _group_sizes(group_sizes, pertoken_scale, scale, m, k, n)
    return _MXCall(fmt1, fmt2, m, k, n, nz)


def _weight_bytes(x2, call: _MXCall) -> torch.Tensor:
    """The weight as ND [N, K] (FP8) or [N, K/2] packed FP4 bytes, from whichever layout x2 has."""
    if not call.nz:
        return x2.t()
    if x2.is_contiguous():  # the cast of [K/2, N], passed as is
        return nz_to_nd(x2.view(torch.uint8), call.k // 2, call.n, c0=FP4_NZ_C0_BYTES).t()
    return nz_to_nd(x2.transpose(-1, -2).view(torch.uint8), call.n, call.k // 2, c0=FP4_NZ_C0_BYTES)


def _packed(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float4_e2m1fn_x2, torch.int8) else t


@torch.library.register_kernel("mxfx::npu_quant_matmul", ("cpu", "cuda"))
def _quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                  x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    """MX modes (aclnnQuantMatmulV5 / WeightNz): x1 float8_e4m3fn [M, K] or packed FP4 [M, K/2] with
    pertoken_scale [M, K/64, 2]; x2 the weight as a [K, N] view of [N, K] (FP8), a [K/2, N] view of
    packed FP4 [N, K/2], or that FP4 weight's emulated NZ (as cast, or transposed as the peers do), with
    scale the [K/64, N, 2] view of [N, K/64, 2]. Dtypes come from x1_dtype/x2_dtype/..._dtype (any
    spelling torch_npu takes) or, omitted, from the tensors. Strides are honoured, views never copied."""
    call = _quant_matmul_call(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                              pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)

    def decode_weight():
        return _mx_operand(_packed(_weight_bytes(x2, call)), scale.transpose(0, 1), call.fmt2, call.k).t().contiguous()

    b = DECODED_WEIGHTS.get((x2, scale), decode_weight)
    a = _mx_operand(_packed(x1), pertoken_scale, call.fmt1, call.k)
    return _finish(a @ b, bias, from_scalar_type(output_dtype))


@torch.library.register_fake("mxfx::npu_quant_matmul")
def _quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                       y_scale=None):
    call = _quant_matmul_call(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                              pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    return x1.new_empty((call.m, call.n), dtype=from_scalar_type(output_dtype))
