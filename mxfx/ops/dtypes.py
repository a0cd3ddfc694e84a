"""The dtype arguments of torch_npu's operators, as torch_npu takes them.

torch_npu's schemas type them `int` (`int dst_type`, `int? output_dtype`, ...): a torch.dtype passed
there arrives as its c10::ScalarType number (torch's argument parser converts it), and torch_npu's
`c10_npu::GetAclDataType(int64_t)` accepts both that number and torch_npu's own codes, 256 + aclDataType
(`torch_npu.float8_e8m0fnu` is 293, `torch_npu.float4_e2m1fn_x2` 296; op-plugin
`op_plugin/utils/op_api_common.h`, `_meta_registrations.py`). mxfx's schemas keep `int` and every op
normalises through `dtype_arg`.

c10 Float4_e2m1fn_x2 (45, `torch.float4_e2m1fn_x2`) is not accepted as a code: torch_npu's
ScalarType->aclDataType table has no entry for it (GetAclDataType fails in eager mode), so FP4 is
`torch_npu.float4_e2m1fn_x2` (296); the meta registrations are laxer, mxfx follows eager.
"""

import torch

# c10::ScalarType numbers of the dtypes torch_npu maps to an aclDataType
C10_CODES = {
    "uint8": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 5, "float32": 6, "float64": 7,
    "bool": 11, "bfloat16": 15, "float8_e5m2": 23, "float8_e4m3fn": 24, "float8_e8m0fnu": 44,
}
# torch_npu's codes: 256 + aclDataType
NPU_CODES = {
    "float32": 256, "float16": 257, "int8": 258, "int32": 259, "uint8": 260, "int16": 262, "int64": 265,
    "bfloat16": 283, "int4": 285, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292,
    "float8_e8m0fnu": 293, "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297,
}
_NAME_OF_CODE = {**{c: n for n, c in C10_CODES.items()}, **{c: n for n, c in NPU_CODES.items()}}
C10_FLOAT4_E2M1FN_X2 = 45

# c10::ScalarType numbers, as torch_npu's `int output_dtype` arguments take them
SCALAR_TYPE = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}

FLOAT8_E4M3FN = NPU_CODES["float8_e4m3fn"]
FLOAT8_E8M0FNU = NPU_CODES["float8_e8m0fnu"]
FLOAT4_E2M1FN_X2 = NPU_CODES["float4_e2m1fn_x2"]

ACL_FORMAT_FRACTAL_NZ = 29

# the torch dtype of a tensor that holds each dtype on the CPU reference
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
    "uint8": torch.uint8, "int32": torch.int32, "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2, "float8_e8m0fnu": torch.float8_e8m0fnu,
}


def _spell(name: str) -> str:
    codes = [f"c10 {C10_CODES[name]}"] if name in C10_CODES else []
    codes += [f"torch_npu {NPU_CODES[name]}"] if name in NPU_CODES else []
    return f"{name} ({', '.join(codes)})"


def dtype_name(value) -> str | None:
    """The dtype a torch_npu dtype argument names (a torch.dtype, a c10 code or a torch_npu code), or
    None for a number torch_npu does not map."""
    if isinstance(value, torch.dtype):
        fp4 = C10_FLOAT4_E2M1FN_X2 if value == torch.float4_e2m1fn_x2 else -1
        value = C10_CODES.get(str(value).removeprefix("torch."), fp4)
    return _NAME_OF_CODE.get(value)


def dtype_arg(value, arg: str, op: str, allowed: tuple[str, ...]) -> str:
    """Normalise one dtype argument to its name; a ValueError names the argument and the allowed values."""
    name = dtype_name(value)
    if name in allowed:
        return name
    spelled = ", ".join(_spell(a) for a in allowed)
    why = ""
    if value in (C10_FLOAT4_E2M1FN_X2, torch.float4_e2m1fn_x2):
        why = " (torch.float4_e2m1fn_x2 has no aclDataType in torch_npu's ScalarType table: pass torch_npu's 296)"
    elif name is not None:
        why = f" ({name} is not emulated by mxfx's reference)"
    raise ValueError(f"{op}: {arg}={value!r} is not supported{why}; use one of: {spelled}")


def tensor_dtype(tensor: torch.Tensor, code, arg: str, op: str, allowed: tuple[str, ...]) -> str:
    """The dtype torch_npu reads a tensor as: the explicit code if given, else the tensor's own dtype."""
    if code is not None:
        return dtype_arg(code, arg, op, allowed)
    name = "float4_e2m1fn_x2" if tensor.dtype == torch.float4_e2m1fn_x2 else str(tensor.dtype).removeprefix("torch.")
    if name in allowed:
        return name
    raise ValueError(f"{op}: {arg} omitted and the tensor is {tensor.dtype}; pass {arg} (one of: "
                     f"{', '.join(_spell(a) for a in allowed)}) or a tensor of that dtype")


OUTPUT_DTYPES = ("bfloat16", "float16", "float32")


def from_scalar_type(code, arg: str = "output_dtype", op: str = "mxfx") -> torch.dtype:
    """The torch dtype of an `output_dtype` argument (bf16, fp16 or fp32, by any of its spellings)."""
    return TORCH_DTYPES[dtype_arg(code, arg, op, OUTPUT_DTYPES)]
