"""mxfx::npu_weight_quant_batchmatmul and mxfx::npu_convert_weight_to_int4pack: torch_npu's weight-only
quantized matmul (int8 weights, or int4 packed 8 per int32) and its int4 packer, argument for argument.

The CPU reference follows the ops-nn kernel golden (weight_quant_batch_matmul_v2 wqbmmv2_kernel_golden.py):
the weight is dequantized in the activation's dtype, `Wdq = dtype(w * scale)` (with an offset,
`dtype(dtype(w + offset) * scale)`), scale per output channel or per group of K rows; then one fp32
matmul with x, the bias in fp32, and one cast to x's dtype. Only the dequant-then-matmul kernels are
emulated: the A2/A3 "MSD" tilings (int4, group 64/128, M <= group/8) split x into integer digits instead
and round differently (ops-nn weight_quant_batch_matmul_v2_tiling_msd_group.cpp). The int4 packing is
op-plugin's ConvertWeightToINT4PackKernelNpuOpApi.cpp.
"""

import torch

from mxfx.formats import pack_int4, unpack_int4
from mxfx.tensor_cache import TensorCache

from .matmul import _finish

torch.library.define(
    "mxfx::npu_weight_quant_batchmatmul",
    "(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset=None, Tensor? quant_scale=None, "
    "Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0, "
    "int? weight_dtype=None) -> Tensor",
)
torch.library.define("mxfx::npu_convert_weight_to_int4pack", "(Tensor weight, int inner_k_tiles=0) -> Tensor")

INT4_PER_INT32 = 8
# The int4 weight dequantized to fp32 [K, N], kept while the weight constant lives (decoding on each call
# costs 10-40x the GEMM at M=1). Unlike the MX matmuls, this one still holds 4 bytes per weight element.
DECODED_WEIGHTS = TensorCache()
BIAS_DTYPES = {torch.bfloat16: torch.float32, torch.float16: torch.float16}


def _check_int4pack(weight):
    if weight.dtype != torch.int32 or weight.dim() != 2 or weight.shape[-1] % INT4_PER_INT32:
        raise ValueError(f"npu_convert_weight_to_int4pack: weight must be int32 [k, n] with n a multiple of 8, "
                         f"got {weight.dtype} {list(weight.shape)}")


@torch.library.register_kernel("mxfx::npu_convert_weight_to_int4pack", ("cpu", "cuda"))
def _convert_weight_to_int4pack(weight, inner_k_tiles=0):
    """int32 values in [-8, 7] [k, n] -> int32 [k, n/8], value 8c+i in bits 4i..4i+3 of word c."""
    _check_int4pack(weight)
    return pack_int4(weight).view(torch.int32)


@torch.library.register_fake("mxfx::npu_convert_weight_to_int4pack")
def _convert_weight_to_int4pack_fake(weight, inner_k_tiles=0):
    _check_int4pack(weight)
    return weight.new_empty((weight.shape[0], weight.shape[1] // INT4_PER_INT32))


def _weight_quant_shapes(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                         antiquant_group_size, inner_precise, weight_dtype) -> tuple[int, int]:
    """(K, N) of a call the reference supports, else a ValueError saying what is not."""
    what = "npu_weight_quant_batchmatmul"
    if x.dim() != 2 or x.dtype not in BIAS_DTYPES:
        raise ValueError(f"{what}: x must be 2-D [M, K] bf16/fp16, got {x.dtype} {list(x.shape)}")
    if quant_scale is not None or quant_offset is not None or weight_dtype is not None:
        raise ValueError(f"{what}: quant_scale, quant_offset (int8 output) and weight_dtype are not supported here")
    if inner_precise != 0:
        raise ValueError(f"{what}: only inner_precise=0 (the high-precision kernel) is emulated, got {inner_precise}")
    k = x.shape[1]
    if weight.dtype not in (torch.int8, torch.int32) or weight.dim() != 2 or weight.shape[0] != k:
        raise ValueError(f"{what}: weight must be int8 [K, N] or int4-packed int32 [K, N/8] with K={k}, "
                         f"got {weight.dtype} {list(weight.shape)}")
    n = weight.shape[1] * (INT4_PER_INT32 if weight.dtype == torch.int32 else 1)
    group = antiquant_group_size
    if group and (group % 32 or not 32 <= group < k):
        raise ValueError(f"{what}: antiquant_group_size must be 0 or a multiple of 32 in [32, K-1], got {group}")
    shapes = [((-(-k // group)), n)] if group else [(n,), (1, n)]
    for name, t in (("antiquant_scale", antiquant_scale), ("antiquant_offset", antiquant_offset)):
        if t is not None and (tuple(t.shape) not in shapes or t.dtype != x.dtype):
            raise ValueError(f"{what}: {name} must be {x.dtype} of shape {' or '.join(map(str, map(list, shapes)))}, "
                             f"got {t.dtype} {list(t.shape)}")
    if bias is not None and (tuple(bias.shape) not in ((n,), (1, n)) or bias.dtype != BIAS_DTYPES[x.dtype]):
        raise ValueError(
            f"{what}: bias must be {BIAS_DTYPES[x.dtype]} [N] for {x.dtype} x, got {bias.dtype} {list(bias.shape)}")
    return k, n


def dequantized_weight(values, scale, offset, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the kernel dequantizes it, [N, K] in `dtype`, from integer values [N, K] and a scale
    (and offset) in `dtype`, [N] or [N, ceil(K/group)]. Computing in bf16/fp16 here rounds once, as
    the golden's fp32 products truncated to `dtype` do: a sum or product of a small integer and a
    bf16/fp16 value is exact in fp32."""
    n, k = values.shape
    step = group or k
    blocks = -(-k // step)
    w = values.to(dtype, memory_format=torch.contiguous_format)  # a new tensor (values are integers)
    if blocks * step != k:  # a last, shorter group
        w = torch.nn.functional.pad(w, (0, blocks * step - k))
    grouped = w.view(n, blocks, step)
    if offset is not None:
        grouped.add_(offset.reshape(n, blocks, 1))
    grouped.mul_(scale.reshape(n, blocks, 1))
    return w[:, :k]


@torch.library.register_kernel("mxfx::npu_weight_quant_batchmatmul", ("cpu", "cuda"))
def _weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                              bias=None, antiquant_group_size=0, inner_precise=0, weight_dtype=None):
    _weight_quant_shapes(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                         antiquant_group_size, inner_precise, weight_dtype)

    def decode():  # fp32 [K, N] for the GEMM
        values = unpack_int4(weight.contiguous().view(torch.uint8)) if weight.dtype == torch.int32 else weight
        offset = None if antiquant_offset is None else antiquant_offset.t()
        w = dequantized_weight(values.t(), antiquant_scale.t(), offset, antiquant_group_size, x.dtype)
        return w.t().contiguous().float()

    sources = (weight, antiquant_scale) + ((antiquant_offset,) if antiquant_offset is not None else ())
    w = DECODED_WEIGHTS.get(sources, decode, extra=(antiquant_group_size, x.dtype))
    return _finish(x.float() @ w, bias, x.dtype)


@torch.library.register_fake("mxfx::npu_weight_quant_batchmatmul")
def _weight_quant_batchmatmul_fake(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                   quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                   weight_dtype=None):
    _, n = _weight_quant_shapes(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                antiquant_group_size, inner_precise, weight_dtype)
    return x.new_empty((x.shape[0], n))
