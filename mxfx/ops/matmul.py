"""mxfx::npu_dual_level_quant_matmul and mxfx::npu_quant_matmul (its MX modes): torch_npu's quantized
matmuls, argument for argument, with a CPU (and CUDA) reference in the ops-nn golden's order
(notes/npu_ops.md §3.1, §4.3): per 32-group the sum of the element products in fp32, times the x1 then
the x2 E8M0 scale, accumulated over the groups in order (dual level: over the 16 groups of each level-0
group, scaled by level0(x1) * level0(x2), those accumulated in order), then the bias in fp32, then a
single cast to the output dtype. The products of FP4/FP8 elements are exact in fp32, and so are the
32-sums of FP4 x FP4 (any order); FP8 sums round, in the order mx_kernels.c documents (the NPU's own
order inside a group is not documented).

On the CPU the native kernels (mxfx.formats.native.try_mx_matmul) read the prepared operands where they
lie, packed weight bytes (ND or NZ) and scales, decoding in registers: nothing is decoded ahead of a
call or kept. Elsewhere (CUDA; MXFX_KERNELS=torch; no C compiler) torch decodes both operands on each
call and follows the same order, one group at a time."""

import math
from typing import NamedTuple

import torch

from mxfx.formats import e2m1_decode, e8m0_decode, from_paired_scales, native, nz_to_nd, unpack_fp4

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


GROUP = 32


def _element_values(codes: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """fp32 [rows, ceil(K/32) * 32] element values (no scale), zero padded."""
    values = e2m1_decode(unpack_fp4(codes.view(torch.uint8))) if fmt == "fp4_e2m1" else codes.float()
    return torch.nn.functional.pad(values, (0, -(-k // GROUP) * GROUP - k))


def _in_order(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """start + terms[0] + terms[1] + ... added left to right (torch's sum does not promise an order)."""
    acc = torch.zeros_like(terms[0]) if start is None else start
    for term in terms:
        acc = acc + term
    return acc


def _grouped_product(a, sa, b, sb, level0) -> torch.Tensor:
    """The golden's order in torch: a [M, Kp] and b [N, Kp] element values, sa [M, G] and sb [N, G] scale
    values; level0 (l0a [M, G0], l0b [G0, N]) or None. One level-0 group (16 groups) at a time."""
    m, n, groups = a.shape[0], b.shape[0], sa.shape[1]
    acc = a.new_zeros(m, n)
    for g0, first in enumerate(range(0, groups, LEVEL0 // GROUP)):
        part = slice(first, min(groups, first + LEVEL0 // GROUP))
        count = part.stop - first
        a_g = a[:, first * GROUP:part.stop * GROUP].reshape(m, count, GROUP).transpose(0, 1)
        b_g = b[:, first * GROUP:part.stop * GROUP].reshape(n, count, GROUP).permute(1, 2, 0)
        partial = torch.bmm(a_g, b_g)  # [count, M, N], one 32-sum per element
        scaled = (partial * sa[:, part].t().unsqueeze(-1)) * sb[:, part].t().unsqueeze(1)
        if level0 is None:
            acc = _in_order(scaled, acc)
        else:
            acc = acc + (level0[0][:, g0:g0 + 1] * level0[1][g0:g0 + 1]) * _in_order(scaled)
    return acc


def _mx_product(a, fmt_a, a_paired, b, fmt_b, b_paired, k, n, nz_c0=None, level0=None) -> torch.Tensor:
    """fp32 [M, N]: a the activation codes [M, K or K/2] with its paired scales [M, K/64, 2]; b the
    weight's bytes, ND [N, K or K/2] or (nz_c0) its FRACTAL_NZ storage, b_paired [N, K/64, 2]."""
    a_scale, b_scale = (s if s.dtype == torch.uint8 else s.view(torch.uint8) for s in (a_paired, b_paired))
    out = native.try_mx_matmul(a.view(torch.uint8), fmt_a, a_scale, b.view(torch.uint8), fmt_b, b_scale, k, n, nz_c0,
                               level0)
    if out is not None:
        return out
    groups = -(-k // GROUP)
    sa = e8m0_decode(from_paired_scales(a_scale, groups))
    kbytes = k if fmt_b == "fp8_e4m3" else k // 2
    b_nd = b if nz_c0 is None else nz_to_nd(b.view(torch.uint8), n, kbytes, c0=nz_c0)
    if fmt_b == "fp8_e4m3":
        b_nd = b_nd.view(torch.float8_e4m3fn)
    sb = e8m0_decode(from_paired_scales(b_scale, groups))
    level0 = None if level0 is None else tuple(t.float() for t in level0)
    return _grouped_product(_element_values(a, fmt_a, k), sa, _element_values(b_nd, fmt_b, k), sb, level0)


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
    acc = _mx_product(x1, "fp4_e2m1", x1_level1_scale, x2.contiguous(), "fp4_e2m1", x2_level1_scale, k, n,
                      nz_c0=x2.shape[-1], level0=(x1_level0_scale, x2_level0_scale))
    return _finish(acc, bias, from_scalar_type(output_dtype))


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


def _weight_bytes(x2, call: _MXCall) -> tuple[torch.Tensor, int | None]:
    """The weight's bytes as the matmul reads them in place: ND [N, K] (FP8) or [N, K/2] (packed FP4), or
    the NZ storage of [N, K/2] with its c0; the cast of [K/2, N] (K-major) is laid out ND for the call."""
    if not call.nz:
        return x2.t(), None
    if x2.is_contiguous():  # the cast of [K/2, N], passed as is
        return nz_to_nd(x2.view(torch.uint8), call.k // 2, call.n, c0=FP4_NZ_C0_BYTES).t(), None
    return x2.transpose(-1, -2), FP4_NZ_C0_BYTES


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

    weight, nz_c0 = _weight_bytes(x2, call)
    acc = _mx_product(x1, call.fmt1, pertoken_scale, weight, call.fmt2, scale.transpose(0, 1), call.k, call.n, nz_c0)
    return _finish(acc, bias, from_scalar_type(output_dtype))


@torch.library.register_fake("mxfx::npu_quant_matmul")
def _quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                       y_scale=None):
    call = _quant_matmul_call(x1, x2, scale, offset, pertoken_scale, output_dtype, x1_dtype, x2_dtype,
                              pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    return x1.new_empty((call.m, call.n), dtype=from_scalar_type(output_dtype))
